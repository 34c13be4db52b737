"""Prefect 3 orchestration of the DVC pipeline: the flow, its alerts, schedules and data-change trigger."""
