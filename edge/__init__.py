"""The Ironlink edge agent (``ironlink-agent``): protocol adapters, normalization into the
telemetry contract, store-and-forward with end-to-end receipts. Installed on gateways; imports the
contract and the catalog (``ingest``), never the Pulumi program."""
