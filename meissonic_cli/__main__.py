from meissonic_cli.cli import main

main()
