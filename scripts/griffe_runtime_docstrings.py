"""A griffe extension for the documentation site (mkdocs.yml): docstrings assigned at import time.

`Spade.__doc__` gets its Parameters section from the settings table when `spade_ad.estimators.spade` is imported, which
griffe's static analysis does not see. For each module statement `Name.__doc__ = ...`, this imports the module and
gives the documented object its runtime docstring, so the API reference shows what `help()` shows.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    def on_module_members(self, *, node: ast.AST | griffe.ObjectNode, mod: griffe.Module, **kwargs: Any) -> None:
        if not isinstance(node, ast.Module):
            return
        for statement in node.body:
            if not isinstance(statement, ast.Assign):
                continue
            for target in statement.targets:
                if (isinstance(target, ast.Attribute) and target.attr == "__doc__"
                        and isinstance(target.value, ast.Name) and target.value.id in mod.members):
                    value = getattr(importlib.import_module(mod.path), target.value.id)
                    member = mod.members[target.value.id]
                    static = member.docstring  # parsed in the style the site asks for (numpy): keep it
                    member.docstring = griffe.Docstring(
                        inspect.getdoc(value) or "", parent=member, parser=static and static.parser,
                        parser_options=static and static.parser_options,
                    )
                    _runtime_defaults(member, value)


def _runtime_defaults(member: griffe.Object, value: Any) -> None:
    """Defaults written as expressions (`D["k_gallery"]`, read from the settings table) shown as their values."""
    function = member.members.get("__init__") if member.is_class else member
    if function is None or not function.is_function:
        return
    runtime = inspect.signature(value.__init__ if member.is_class else value).parameters
    for parameter in function.parameters:
        if parameter.name in runtime and runtime[parameter.name].default is not inspect.Parameter.empty:
            parameter.default = repr(runtime[parameter.name].default)
