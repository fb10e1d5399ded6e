"""What people run and read: the `rpcwatch` command line (`cli`, its subcommands in `commands/`),
its tables (`report`), plots, the demo, and the local Airflow environment."""
