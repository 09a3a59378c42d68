"""`python -m csm.train ...` is `csm-train ...`, so torchrun can start it:
`torchrun --nproc_per_node=8 -m csm.train --config config.json`."""

from csm.cli.train import main

if __name__ == "__main__":
    main()
