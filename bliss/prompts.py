"""Prompt templates: the paper's default and filling ``{label}`` into a template."""

from __future__ import annotations

import string

from bliss.errors import InvalidInputError

DEFAULT_PROMPT_TEMPLATE = "This is a photo of a {label}"


def format_prompt(template: str, label: str) -> str:
    """Fill ``{label}`` in a prompt template; the template must have exactly that one field."""
    check_template(template)
    return template.format(label=label)


def check_template(template: str) -> None:
    """InvalidInputError unless ``template`` has the field ``{label}`` once and no other."""
    usage = (
        "a prompt template must contain the field {label} exactly once and no other "
        "{...} field (write {{ and }} for literal braces), e.g. " + repr(DEFAULT_PROMPT_TEMPLATE)
    )
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:
        raise InvalidInputError(f"bad prompt template {template!r} ({error}): {usage}") from error
    if fields != [("label", "", None)]:
        raise InvalidInputError(f"bad prompt template {template!r}: {usage}")
