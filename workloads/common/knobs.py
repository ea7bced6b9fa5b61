"""Every knob of a workload, for `--help`: each section's fields with the value a trial gets by default
(the workload's default where it sets one, else the section's own) and the field's type."""

from __future__ import annotations

import dataclasses
import typing


def knobs(workload) -> list[tuple[str, object, str]]:
    """(section.field, default, type) for every field of every section; `attn` for its default method."""
    rows = []
    for section, cls in workload.sections.items():
        given = workload.defaults.get(section, {})
        if section == "attn":
            from attention import get as method_spec

            cls = method_spec(given["method"]).config_cls
            rows.append(("attn.method", given["method"], "str"))
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            default = given.get(field.name, field.default)
            rows.append((f"{section}.{field.name}", default, getattr(hints.get(field.name), "__name__",
                                                                     str(hints.get(field.name, "")))))
    rows.append(("seed", workload.defaults["seed"], "int"))
    return rows


def knob_table(workload) -> str:
    rows = knobs(workload)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"knobs (defaults of {workload.name}; the attention method's own knobs: attention.methods()):"]
    lines += [f"  {name:<{width}}  {default!r:<24} {kind}" for name, default, kind in rows]
    return "\n".join(lines)
