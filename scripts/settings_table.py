"""Prints the README's settings table from `service.settings.Settings` (the source of truth)."""

from __future__ import annotations

from dataclasses import fields

from service.settings import Settings, show_value


def main() -> None:
    print("| flag | environment | default | meaning |")
    print("| --- | --- | --- | --- |")
    for f in fields(Settings):
        default = show_value(f.default)
        if f.name == "model_repository":
            default = "model_repository"
        flag = "--" + f.name.replace("_", "-")
        print(f"| `{flag}` | `CLIP_{f.name.upper()}` | `{default}` | {f.metadata['help']} |")


if __name__ == "__main__":
    main()
