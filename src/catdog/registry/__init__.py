"""The MLflow Model Registry as the source of truth for what is deployed.

Aliases: `challenger` (the newest registered version, served by staging), `champion` (production) and
`previous` (what a rollback would choose: the newest older version that passed the gates and was never rolled
back from). `store` talks to MLflow, `audit` records every alias move, `gates` holds the promotion gates,
`promotion` registers, promotes and rolls back, `lease` keeps two moves apart and `moves` makes each one
crash-safe.
"""

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous"
