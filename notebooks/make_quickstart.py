"""Writes notebooks/quickstart.ipynb (run: python notebooks/make_quickstart.py). Edit here, not in the .ipynb."""
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# deediff_jax quickstart: early-exit diffusion in JAX

Train a small class-conditional DeeDiff U-ViT on scikit-learn's 8×8 digits, then sample with and
without early exit, look at where samples exit over the timesteps, and measure what it saves.

**On Colab:** `Runtime → Change runtime type` (CPU is fine), then run the first cell. It clones
and installs the package if it is not importable yet: put your copy of this repository's git URL
in `REPO_URL` in that cell (or in the environment variable `DEEDIFF_REPO_URL`).

**Time on a 2-core CPU:** training takes 2½ to 5 minutes (as the README's Quickstart), and the
sweep at the end about 10 minutes more (the same kind of sweep took 578 s from the command line),
so plan on a quarter of an hour. A GPU runtime is faster."""),
    new_code_cell("""import os, subprocess, sys
REPO_URL = ""  # your copy of this repository's git URL (https), for Colab
REPO_URL = REPO_URL or os.environ.get("DEEDIFF_REPO_URL", "")
try:
    import deediff_jax  # already installed (local checkout with pip install -e .)
except ImportError:
    if not os.path.exists("pyproject.toml"):
        if not REPO_URL:
            raise SystemExit("set REPO_URL in this cell (or DEEDIFF_REPO_URL) to this repository's git URL, "
                             "or run from a checkout")
        subprocess.run(["git", "clone", "-q", REPO_URL, "deediff_jax_repo"], check=True)
        os.chdir("deediff_jax_repo")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt", "-e", "."], check=True)
    sys.path.insert(0, os.getcwd())
    import deediff_jax
print("deediff_jax", deediff_jax.__version__)"""),
    new_markdown_cell("""## Settings

`DEEDIFF_NOTEBOOK_QUICK=1` (used by the test suite) shrinks everything to seconds; the default
trains the real quickstart model (`configs/digits.py`: 2½ to 5 minutes on a 2-core CPU)."""),
    new_code_cell("""import json
import jax, numpy as np
from IPython.display import Image, Markdown, display
from deediff_jax.config import load_config_file

QUICK = os.environ.get("DEEDIFF_NOTEBOOK_QUICK", "0") == "1"
WORKDIR = os.environ.get("DEEDIFF_NOTEBOOK_WORKDIR", "/tmp/deediff_quickstart")
overrides = {"train.sample_at_end": False}
if QUICK:
    overrides.update({"model.embed_dim": 32, "model.depth": 4, "model.num_heads": 2,
                      "train.num_steps": 20, "train.batch_size": 32, "train.log_every": 10,
                      "train.checkpoint_every": 20, "sample.steps": 8, "sample.num_images": 20,
                      "sample.batch_size": 20, "sweep.num_images": 20, "sweep.classifier_steps": 60,
                      "sweep.thresholds": "0.3,0.6", "sweep.cosine_thresholds": "0.9",
                      "sweep.depths": "2,4", "sweep.time_schedules": "2,5",
                      "sweep.policies": "uem,static,none", "sweep.step_fractions": ""})
config = load_config_file("configs/digits.py", overrides)
print(jax.devices(), "| workdir:", WORKDIR)"""),
    new_markdown_cell("""## Train

Joint DeeDiff training: the diffusion loss, the uncertainty loss L_u and the
uncertainty-aware layer loss L_UAL. It resumes from `WORKDIR` if a checkpoint is there."""),
    new_code_cell("""from deediff_jax.train.trainer import train
from deediff_jax.train.metrics import read_metrics
import matplotlib.pyplot as plt

state = train(config, WORKDIR, progress=not QUICK)
m = read_metrics(WORKDIR)
fig, ax = plt.subplots(figsize=(7, 3))
for key in ("loss", "loss_simple", "loss_u", "loss_ual"):
    ax.plot([r["step"] for r in m], [r[key] for r in m], label=key)
ax.set_yscale("log"); ax.set_xlabel("step"); ax.legend(); plt.show()"""),
    new_markdown_cell("""## Sample with and without early exit

Same seed, same initial noise. `policy=none` runs every block; `policy=uem` stops each
sample at the first block whose uncertainty is below the threshold."""),
    new_code_cell("""from deediff_jax.train.checkpoint import load_params
from deediff_jax import sampling
from deediff_jax.early_exit import make_policy_params
from deediff_jax.eval import plots
from deediff_jax.eval.fidelity import fidelity
import time

params = load_params(WORKDIR, config)
n_blocks = config.model.depth + 1
num = config.sample.num_images
labels = np.arange(num) % 10
rng = jax.random.PRNGKey(0)

def run(policy, **kw):
    pp = make_policy_params(n_blocks, **kw)
    sampling.sample(params, config, rng, num, policy=policy, policy_params=pp, labels=labels)  # compile
    t0 = time.perf_counter()
    images, stats = sampling.sample(params, config, rng, num, policy=policy, policy_params=pp, labels=labels)
    return images, stats, time.perf_counter() - t0

full, full_stats, t_full = run("none")
exit_imgs, exit_stats, t_exit = run("uem", threshold=0.1)
summary = sampling.summarize(exit_stats, n_blocks)
print(f"full depth {t_full:.2f}s | early exit {t_exit:.2f}s | speedup {t_full / t_exit:.2f}x | "
      f"layers run {summary['layer_ratio_run']:.2f} of full | PSNR vs full "
      f"{fidelity(full, exit_imgs)['psnr_vs_full']:.1f} dB")
display(Image(plots.image_grid(full, f"{WORKDIR}/nb_full.png", nrow=10, scale=4)))
display(Image(plots.image_grid(exit_imgs, f"{WORKDIR}/nb_exit.png", nrow=10, scale=4)))"""),
    new_markdown_cell("""## Where do samples exit?

Rows are sampling steps (noisiest on top), columns the block after which samples exited."""),
    new_code_cell("""fig = plots.exit_heatmap_figure(exit_stats["exit_layer"], n_blocks)
display(fig)"""),
    new_markdown_cell("""## Speed and quality over policies and thresholds

`--mode sweep` from Python: DeeDiff's UEM against static depth, an ASE-style time schedule and
CALM-style state cosine, each at the same seeds. FID here is *classifier-FID* (features of a
small CNN trained on digits), not comparable to Inception FID. On a 2-core CPU this takes about
10 minutes: every policy at several settings, 200 images each, plus the classifier."""),
    new_code_cell("""from deediff_jax.eval import sweep
rows = sweep.run(config, WORKDIR, progress=False)
display(Markdown(open(f"{WORKDIR}/sweep/sweep.md").read()))
display(Image(f"{WORKDIR}/sweep/pareto_fid.png"))"""),
    new_markdown_cell("""## Next: one answer for your budget

The sweep shows the whole trade-off; to *use* early exit, let `--mode tune` choose. Give it a
budget, the share of full-depth GFLOPs per image; it compares every exit policy and fewer sampler
steps within that budget on calibration noise, measures its choice on held-out noise and writes
`tuned.json`, which `--mode sample` then uses:

```bash
python -m deediff_jax.main --config configs/digits.py --workdir /tmp/deediff_quickstart --mode tune --config.tune.budget=0.55
python -m deediff_jax.main --config configs/digits.py --workdir /tmp/deediff_quickstart --mode sample --config.tune.file=/tmp/deediff_quickstart/tuned.json
```

The method, the results and every option: the repository's `README.md` and `docs/`."""),
]

nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
path = pathlib.Path(__file__).with_name("quickstart.ipynb")
nbformat.write(nb, path)
print("wrote", path)
