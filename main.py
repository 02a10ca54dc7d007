"""Entry point: `python main.py --model ... --wbits 3 --group_size 128 --lwc --epochs 20 --eval_ppl`."""
from affinequant.cli import main

if __name__ == "__main__":
    main()
