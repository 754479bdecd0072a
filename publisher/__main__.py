from virtpub.cli.main import main

main()
