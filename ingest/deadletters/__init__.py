"""The dead-letter consumer (``python -m ingest.deadletters``): ``dlq/#`` into the registry, and
replays back through the worker.

- :mod:`.document` reads one dead-letter document (bounded, never raises);
- :mod:`.settings` holds its ``IRONLINK_DLQ_*`` settings;
- :mod:`.consumer` stores each dead letter before acknowledging it, republishes the ones an
  operator asked to replay (``ironlink deadletters replay``) to ``replay/<topic>``, and purges
  those past their tenant's retention.
"""
