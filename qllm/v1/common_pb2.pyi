from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LATENCY_SENSITIVE: _ClassVar[Priority]
    PRIORITY_BEST_EFFORT: _ClassVar[Priority]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LATENCY_SENSITIVE: Priority
PRIORITY_BEST_EFFORT: Priority
