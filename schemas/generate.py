"""Write the JSON Schema of every topic value and HTTP body under `schemas/jsonschema/`.

Run with `make schemas`; a unit test fails when the committed files are stale.
"""

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.api import (
    ErrorResponse,
    MessageAccepted,
    MessageRequest,
    MessageStatus,
    SuppressionRequest,
)
from schemas.catalogue import TOPICS

OUT_DIR = Path(__file__).parent / "jsonschema"
API_MODELS: tuple[type[BaseModel], ...] = (
    MessageRequest,
    MessageAccepted,
    ErrorResponse,
    SuppressionRequest,
    MessageStatus,
)


def rendered() -> dict[str, str]:
    """File name → JSON text, for every topic with a model and every API body."""
    files: dict[str, str] = {}
    for spec in TOPICS:
        if spec.value is not None:
            files[f"{spec.example_name}.json"] = _dump(spec.value)
    for model in API_MODELS:
        files[f"api.{model.__name__}.json"] = _dump(model)
    return files


def _dump(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n"


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    for old in OUT_DIR.glob("*.json"):
        old.unlink()
    for name, text in rendered().items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(rendered())} schemas to {OUT_DIR}")


if __name__ == "__main__":
    main()
