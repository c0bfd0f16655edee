"""Trains Slim's `mobilenet_tiny` (or `lenet`) with PaddlePaddle on the bundled MNIST split
(data/mnist-10k: 8,004 training and 1,996 test digits), with the recipe of the README's
training table: Adam, learning rate 0.003, batch 64, 5 epochs, inputs normalized with mean
0.1307 and standard deviation 0.3081 as Slim normalizes them, Paddle's default
initialization. One run per seed, each printing its test top-1 after every epoch, so that
Paddle's spread over seeds can be set beside Slim's (`scripts/paddle-train.sh`).

    python paddle_train.py MODEL SEED [SEED ...]
"""
import gzip
import os
import sys
import time

import numpy as np
import paddle
import paddle.nn.functional as F

from paddle_inference import LeNet, MobileNetTiny

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "mnist-10k")


def fail(message):
    """Reports a bad request or file and exits with status 2."""
    print(f"paddle_train.py: {message}", file=sys.stderr)
    sys.exit(2)


def idx(name):
    """The array of an IDX file (gzip), with its magic number checked."""
    with gzip.open(os.path.join(DATA, name), "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    dims = magic & 0xFF
    if magic >> 8 != 0x08 or dims not in (1, 3):
        fail(f"{name}: not an IDX file of unsigned bytes")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def images(name):
    x = idx(name).astype(np.float32) / 255.0
    return ((x - 0.1307) / 0.3081)[:, None, :, :]


def run(model, seed):
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    xtr, ytr = images("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz")
    xte, yte = images("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz")
    net = MobileNetTiny() if model == "mobilenet_tiny" else LeNet()
    opt = paddle.optimizer.Adam(learning_rate=0.003, parameters=net.parameters())
    tops = []
    start = time.time()
    for epoch in range(5):
        net.train()
        order = rng.permutation(len(xtr))
        for i in range(0, len(order), 64):
            at = order[i:i + 64]
            loss = F.cross_entropy(net(paddle.to_tensor(xtr[at])),
                                   paddle.to_tensor(ytr[at].astype(np.int64)))
            loss.backward()
            opt.step()
            opt.clear_grad()
        net.eval()
        with paddle.no_grad():
            pred = np.concatenate([
                net(paddle.to_tensor(xte[i:i + 500])).argmax(1).numpy()
                for i in range(0, len(xte), 500)
            ])
        tops.append(float((pred == yte).mean()))
        print(f"paddle {model} seed {seed} epoch {epoch + 1}: top-1 {100 * tops[-1]:.2f}%",
              flush=True)
    print(f"paddle {model} seed {seed}: top-1 {100 * tops[-1]:.2f}% in {time.time() - start:.0f} s",
          flush=True)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("mobilenet_tiny", "lenet"):
        fail("usage: paddle_train.py mobilenet_tiny|lenet SEED [SEED ...]")
    if not all(seed.isdigit() for seed in sys.argv[2:]):
        fail(f"seeds are whole numbers, got {' '.join(sys.argv[2:])}")
    for seed in sys.argv[2:]:
        run(sys.argv[1], int(seed))


if __name__ == "__main__":
    main()
