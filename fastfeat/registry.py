"""A registry of plug-ins that are one module each in a package (backends, output formats).

Names are the module file names, so listing them imports nothing (the CLI checks a flag before
torch is imported); a plug-in's module is imported when it is first asked for, and its class
registers itself with the decorator.
"""

from __future__ import annotations

import importlib
import pkgutil

from .errors import ConfigError


class Registry:
    def __init__(self, package: str, what: str, suffix: str = "", default: str | None = None, skip=()):
        self.package, self.what, self.suffix, self.default, self.skip = package, what, suffix, default, set(skip)
        self.classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: make ``cls`` available under ``cls.name``."""
        if cls.name in self.classes:
            raise ValueError(f"{self.what} {cls.name!r} is registered twice")
        self.classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        """Every plug-in of the package and every one registered from elsewhere, the default first."""
        path = importlib.import_module(self.package).__path__
        found = [m.name.removesuffix(self.suffix) for m in pkgutil.iter_modules(path)]
        modules = {n for m, n in zip(pkgutil.iter_modules(path), found, strict=True)
                   if m.name.endswith(self.suffix) and m.name not in self.skip}  # fmt: skip
        # A class registered by code outside the package (a user's plug-in, a test's) is one too.
        return sorted(sorted(modules | set(self.classes)), key=lambda n: n != self.default)

    def get(self, name: str) -> type:
        if name in self.classes:  # imported already, or registered from outside the package
            return self.classes[name]
        if name not in self.names():
            raise ConfigError(f"unknown {self.what} {name!r}; choose from {', '.join(self.names())}")
        importlib.import_module(f"{self.package}.{name}{self.suffix}")
        if name not in self.classes:  # a module that forgot its decorator or named its class otherwise
            raise RuntimeError(f"{self.package}.{name}{self.suffix} registers no {self.what} named {name!r}")
        return self.classes[name]
