"""``medimg explain``: for each image, a PNG of the image with the class activation map of
a class (default: the predicted one) over it, through a running Triton server (the model's
``cam`` output) or in process (``--local MODEL``, where ``--gradcam LAYER`` gives Grad-CAM)::

    medimg explain ../shared/data/samples --protocol grpc --out explain/
    medimg explain ../shared/data/samples --local pneumoniamnist-densenet121@champion --class pneumonia
    medimg explain ../shared/data/samples --local pneumoniamnist-densenet121 --gradcam features.denseblock3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.cli.options import add_client_options
from serving.clients.commands import finish
from serving.clients.inputs import collect_items
from training.errors import ConfigError


def cmd_explain(args: argparse.Namespace) -> int:
    from serving.explain.overlay import write_overlays

    if args.gradcam and not args.local:
        raise ConfigError("--gradcam needs --local MODEL (Grad-CAM needs gradients: in process)")
    if args.batch_size < 0:
        raise ConfigError("--batch-size must be >= 0")
    items, errors = collect_items(args.paths, args.split)
    out = Path(args.out)
    if args.local:
        from serving.explain.maps import LocalExplainer
        from training.config import default_tracking_uri
        from training.registry import load_model, resolve_model_uri

        tracking_uri = args.tracking_uri or default_tracking_uri()
        uri, _ = resolve_model_uri(tracking_uri, model=args.local)
        explainer = LocalExplainer(load_model(tracking_uri, uri), args.gradcam)
        explained = write_overlays(
            explainer, items, out, class_name=args.class_name, batch_size=args.batch_size
        )
    else:
        from serving.clients.sync import TritonClassifier

        client = TritonClassifier(
            args.url,
            args.protocol,
            args.model,
            args.timeout_s,
            client_preprocess=args.client_preprocess,
        )
        with client:
            explained = write_overlays(
                client, items, out, class_name=args.class_name, batch_size=args.batch_size
            )
    for one in explained:
        if not one.error:
            print(one.as_text(), flush=True)
    return finish(errors + [e.error for e in explained if e.error], len(explained) + len(errors))


def register(sub) -> None:
    p = sub.add_parser(
        "explain", help="draw class activation maps over images (through Triton or in process)"
    )
    add_client_options(p)
    p.add_argument(
        "--class",
        dest="class_name",
        default="",
        metavar="NAME",
        help="the class whose map is drawn (default: each image's predicted class)",
    )
    p.add_argument("--out", default="explain", help="folder for the PNGs (default %(default)s/)")
    p.add_argument(
        "--local",
        default="",
        metavar="MODEL",
        help="run the registered model in this process (NAME, NAME/VERSION or NAME@ALIAS) "
        "instead of asking a server",
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="--local: MLflow (default $MLFLOW_TRACKING_URI or ./mlruns sqlite)",
    )
    p.add_argument(
        "--gradcam",
        default="",
        metavar="LAYER",
        help="--local: Grad-CAM of LAYER instead of the CAM (e.g. features.denseblock3, "
        "features.norm5, relu: the rectified last feature map)",
    )
    p.set_defaults(func=cmd_explain)
