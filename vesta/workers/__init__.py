"""Job processes: the supervisor thread that owns them and the code that runs inside them."""
