"""The stage engine and the run directory: typed config, the stage table and its wrapper,
manifests, the registry of trained runs, storage (local or S3), the console, the jobs'
command line and Ray nodes on one machine (chaos and tests)."""
