"""The registry's two identities on an MLflow server running the basic-auth app (`mlflow server --app-name
basic-auth`), created or updated by its admin; idempotent, so it runs after every start (compose's
`mlflow-users` job) or by hand against any such server (deploy/README.md).

  pipeline  MANAGE on the registered model: new versions, aliases (@challenger, @champion), tags, and the
            experiments it creates. What `make flow`, `make promote` and `make rollback` use.
  serving   READ only (the server's default_permission, plus an explicit READ grant on the model): resolves
            `models:/NAME@ALIAS` and downloads the model through the artifact proxy; cannot move an alias,
            register a version or change anything the pipeline made. What the prediction services use.

Environment: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the admin),
MLFLOW_PIPELINE_USERNAME / MLFLOW_PIPELINE_PASSWORD, MLFLOW_SERVING_USERNAME / MLFLOW_SERVING_PASSWORD,
MLFLOW_MODEL_NAME (default catdog).
"""

from __future__ import annotations

import os
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client

REQUIRED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_PIPELINE_USERNAME",
    "MLFLOW_PIPELINE_PASSWORD",
    "MLFLOW_SERVING_USERNAME",
    "MLFLOW_SERVING_PASSWORD",
)


def ensure_user(auth, username: str, password: str) -> str:
    """Create the user, or set its password when it exists; never an admin. Returns what was done."""
    try:
        auth.get_user(username)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        done = "created"
    else:
        auth.update_user_password(username, password)
        done = "password set"
    auth.update_user_admin(username, False)
    return done


def grant(auth, username: str, model: str, permission: str) -> None:
    """The user's grant on the registered model is `permission`, whatever it was before."""
    try:
        auth.grant_user_permission(username, "registered_model", model, permission)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, "registered_model", model)
        auth.grant_user_permission(username, "registered_model", model, permission)


def main() -> int:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        print(f"mlflow_users: set {', '.join(missing)}", file=sys.stderr)
        return 2
    env = os.environ
    pipeline, serving = env["MLFLOW_PIPELINE_USERNAME"], env["MLFLOW_SERVING_USERNAME"]
    if len({pipeline, serving, env["MLFLOW_TRACKING_USERNAME"]}) != 3:
        print(
            "mlflow_users: the admin, pipeline and serving users must be three different users",
            file=sys.stderr,
        )
        return 2
    uri, model = env["MLFLOW_TRACKING_URI"], env.get("MLFLOW_MODEL_NAME") or "catdog"
    auth = get_app_client("basic-auth", tracking_uri=uri)
    for username, password in (
        (pipeline, env["MLFLOW_PIPELINE_PASSWORD"]),
        (serving, env["MLFLOW_SERVING_PASSWORD"]),
    ):
        print(f"mlflow_users: {username}: {ensure_user(auth, username, password)}")
    # The model exists before either user can reach it, so the serving user can never create it (and own it).
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_registered_model(model)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(model, description="The Cats-vs-Dogs classifier (catdog pipeline).")
        print(f"mlflow_users: registered model {model} created")
    grant(auth, pipeline, model, "MANAGE")
    grant(auth, serving, model, "READ")
    print(f"mlflow_users: {pipeline} MANAGE, {serving} READ on registered model {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
