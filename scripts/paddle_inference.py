"""Times Paddle Inference (oneDNN, f32) on the networks of Slim's zoo that Paddle's numbers in
the README are quoted for, with the same protocol as `forward_times` (the Slim side of
scripts/paddle-inference.sh): 20 warm-up forwards, then 5 timed runs of 200 forwards at
batch 1 or 20 at batch 64, and the median run. The weights are random: the time of a
forward does not depend on them.

    python paddle_inference.py OUT_DIR THREADS
"""
import os
import sys
import time

import numpy as np
import paddle
import paddle.nn as nn
from paddle import inference


def conv_bn_relu(cin, cout, k, stride=1, groups=1):
    return [
        nn.Conv2D(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias_attr=False),
        nn.BatchNorm2D(cout),
        nn.ReLU(),
    ]


class MobileNetTiny(nn.Layer):
    """Slim's `mobilenet_tiny`: a 3x3 stem of 16, four depthwise-separable blocks."""

    def __init__(self):
        super().__init__()
        layers = conv_bn_relu(1, 16, 3)
        cin = 16
        for cout, stride in [(32, 1), (64, 2), (128, 2), (128, 1)]:
            layers += conv_bn_relu(cin, cin, 3, stride, groups=cin)
            layers += conv_bn_relu(cin, cout, 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(paddle.flatten(self.pool(self.features(x)), 1))


class LeNet(nn.Layer):
    """Slim's `lenet`."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2D(2),
            nn.Conv2D(6, 16, 5), nn.ReLU(), nn.MaxPool2D(2))
        self.head = nn.Sequential(
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x):
        return self.head(paddle.flatten(self.features(x), 1))


def main():
    out, threads = sys.argv[1], int(sys.argv[2])
    paddle.seed(0)
    for name, net in [("mobilenet_tiny", MobileNetTiny()), ("lenet", LeNet())]:
        net.eval()
        path = os.path.join(out, name)
        spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32")]
        paddle.jit.save(net, path, input_spec=spec)
        cfg = inference.Config(path + ".pdmodel", path + ".pdiparams")
        cfg.disable_gpu()
        cfg.enable_mkldnn()
        cfg.set_cpu_math_library_num_threads(threads)
        cfg.switch_ir_optim(True)
        cfg.disable_glog_info()
        predictor = inference.create_predictor(cfg)
        inp = predictor.get_input_handle(predictor.get_input_names()[0])
        outp = predictor.get_output_handle(predictor.get_output_names()[0])
        for batch in [1, 64]:
            x = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)

            def forward():
                inp.reshape(x.shape)
                inp.copy_from_cpu(x)
                predictor.run()
                return outp.copy_to_cpu()

            for _ in range(20):
                forward()
            per = 200 if batch == 1 else 20
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(per):
                    forward()
                runs.append((time.perf_counter() - start) / per * 1e3)
            runs.sort()
            print(f"paddle {name} batch {batch}: {runs[2]:.3f} ms (runs {runs[0]:.3f}..{runs[4]:.3f})",
                  flush=True)


if __name__ == "__main__":
    main()
