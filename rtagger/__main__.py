from rtagger.cli.main import main

if __name__ == "__main__":  # multiprocessing's spawned workers import this without running it
    main()
