"""One module per subcommand. Each defines `register(app)` and keeps heavy imports inside the command body."""
