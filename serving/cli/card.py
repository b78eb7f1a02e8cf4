"""``medimg card``: the model card of a registered version (Markdown, HTML, JSON), from
what its training run logged, attached to the version in MLflow::

    medimg card --model pneumoniamnist-densenet121@champion --out model_card
"""

from __future__ import annotations

import argparse


def cmd_card(args: argparse.Namespace) -> int:
    from training.card import gather_card
    from training.card_render import attach_card, write_card
    from training.config import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    card = gather_card(uri, args.model, args.data_dir)
    examples = cam_examples(uri, card, args) if args.examples else []
    paths = write_card(card, args.out, examples)
    print("wrote " + ", ".join(str(p) for p in paths))
    if not args.no_mlflow:
        print(f"attached to {card['Medimg']['model']}: {attach_card(uri, card, args.out)}")
    return 0


def cam_examples(tracking_uri: str, card: dict, args: argparse.Namespace) -> list[str]:
    """CAM overlays of the first ``--examples`` test images (in process), as file names in
    ``--out``; [] when the model or its data set offers none."""
    from serving.explain.card import card_examples

    name, version = card["BasicInfo"]["ModelName"], card["ReleaseInfo"]["ReleaseVersion"]
    params = {**card["Medimg"].get("config", {}), **card["Medimg"]["recipe"]}
    return card_examples(
        tracking_uri,
        name,
        version,
        args.out,
        count=args.examples,
        data_dir=args.data_dir,
        params=params,
    )


def register(sub) -> None:
    p = sub.add_parser("card", help="write the model card of a registered version (md, html, json)")
    p.add_argument("--model", required=True, help="NAME, NAME/VERSION or NAME@ALIAS")
    p.add_argument("--out", default="model_card", help="output directory (default %(default)s)")
    p.add_argument("--tracking-uri", default="")
    p.add_argument(
        "--data-dir", default="", help="the data set's directory (default: the training run's)"
    )
    p.add_argument("--examples", type=int, default=4, help="CAM examples of test images (0: none)")
    p.add_argument("--no-mlflow", action="store_true", help="do not attach the card to the version")
    p.set_defaults(func=cmd_card)
