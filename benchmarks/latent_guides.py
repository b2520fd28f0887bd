"""Every latent-variable guide on mnist5k with one decoder, budget and seed (issue 3's benchmark).

    python benchmarks/latent_guides.py            # full: both likelihoods, K=1000
    python benchmarks/latent_guides.py --quick    # a one-minute check of the script

Runs ``inference.compare.compare`` for the Bernoulli VAE (dynamically binarized digits) and the
Gaussian VAE (grey levels, learned scalar variance) and writes ``results/latent_guides.json``
and ``results/latent_guides.md``. The VLAE paper expects VLAE > IAF > VAE and Householder at
equal T; this script reports whatever order comes out, with the seconds per epoch of each guide.
"""

import argparse
import sys
from pathlib import Path

import pyro
from common import add_threads_argument, command_line, environment, now, set_threads, write_json

from bayeszoo.inference.compare import compare

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect

GUIDES = "amortized,rank1,planar,radial,householder,sylvester,iaf,laplace"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--is-samples", type=int, default=1000)
    parser.add_argument("--guides", default=GUIDES)
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true", help="digits, 1 epoch, K=25, three guides")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    data, guides, epochs, samples = "mnist5k", args.guides, args.epochs, args.is_samples
    if args.quick:
        data, guides, epochs, samples = "digits", "amortized,planar,laplace", 1, 25
    name = "latent_guides_quick" if args.quick else "latent_guides"
    results, tables, started, env = {}, [], now(), environment(args.device)
    for likelihood in ("bernoulli", "gaussian"):
        folder = Path("runs") / f"bench-{name}-{likelihood}"
        rows = compare("vae", guides, data, options={"likelihood": likelihood, "laplace_steps": 4,
                                                      "flow_length": 8},
                       fit_options={"epochs": epochs, "seed": 0}, is_samples=samples, out=folder,
                       device=args.device, resume=folder.exists())
        results[likelihood] = rows
        tables.append(f"### VAE, {likelihood} likelihood\n\n" + (folder / "compare.md").read_text())
    args.out.mkdir(exist_ok=True)
    record = {"benchmark": name, "command": command_line(), "data": data, "epochs": epochs,
              "is_samples": samples, "started": started, "finished": now(),
              "environment": env, "results": results}
    write_json(record, args.out / f"{name}.json", default=str)
    head = (f"`{record['command']}`, {started} to {record['finished']}; {env['cpu']}, torch threads: "
            f"{env['torch_threads']}, torch {env['torch']}, pyro {env['pyro']}. {data}, {epochs} epochs, "
            f"seed 0, K={samples} importance samples per test image.")
    (args.out / f"{name}.md").write_text("\n\n".join([head, *tables]) + "\n")
    print("\n\n".join([head, *tables]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
