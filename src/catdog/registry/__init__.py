"""The MLflow Model Registry as the source of truth for what is deployed.

Aliases: `challenger` (the newest registered version, served by staging), `champion` (production) and
`previous` (the champion before the last move, for rollbacks). `store` talks to MLflow, `audit` records every
alias move, `gates` holds the promotion gates, `promotion` registers, promotes and rolls back.
"""

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous"
