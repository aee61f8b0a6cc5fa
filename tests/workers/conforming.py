"""A conforming worker in the standard library alone: the footing of the fixtures that break one
rule each. It must pass every check."""

from _rawframe import Conforming

Conforming().serve()
