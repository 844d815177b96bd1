from rtagger.cli import main

main()
