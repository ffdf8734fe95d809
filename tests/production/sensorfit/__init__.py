"""SensorFit: a user's own recoverable pipeline (not the shipped example), deployed with ``prefect deploy`` from
``tests/production/prefect.yaml`` by tests/test_production.py. Registered for ``recover`` through
``PREFECT_RECOVERY_PIPELINES=sensorfit.pipeline`` with this directory's parent on ``PYTHONPATH``."""
