"""``python -m medtransfer``: the CLI, also what ``torchrun -m medtransfer train ...`` starts in each process."""

from medtransfer.cli import main

if __name__ == "__main__":
    main()
