"""What people run and read: the `rpcwatch` command line, its tables, plots, the demo, and the
local Airflow environment."""
