from rtagger.cli.main import main

main()
