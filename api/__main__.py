"""`python -m api`: uvicorn with the host, port, workers and log level of the settings."""

import uvicorn

from api.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        "api.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
