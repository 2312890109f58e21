from dvcray_cli.cli import main

main()
