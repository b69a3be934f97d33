"""Flags of `lifelong bench` (kept free of TensorFlow imports for fast --help)."""


def add_arguments(p) -> None:
    p.add_argument("what", choices=["storage", "train"], help="which benchmark")
    p.add_argument("--data", required=False, help="prepared dataset directory")
    p.add_argument("--long_lens", default="100,10000",
                   help="comma separated L values (storage default 100,10000; "
                   "train e.g. 500,1000,2000)")
    p.add_argument("--models", default="din_l", help="train: comma separated models")
    p.add_argument("--steps", type=int, default=20, help="train: timed steps per L")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--short_len", type=int, default=50)
    p.add_argument("--emb_dim", type=int, default=16)
    p.add_argument("--split", default="test", help="storage: which split")
    p.add_argument("--out", help="write results JSON (and a PNG for train) with this prefix")
