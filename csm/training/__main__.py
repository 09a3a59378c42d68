"""`python -m csm.training ...` is `csm-finetune ...`, so torchrun can start it:
`torchrun --nproc_per_node=N -m csm.training train --config config.json`."""

from csm.cli.finetune import main

if __name__ == "__main__":
    main()
