"""One decorator that marks a name public and registers it for serialization, and `get()`.

Importing this module does not import keras (the command line compares names with
`normalize_name` before any backend is loaded); `export` imports it when first called.
"""

from __future__ import annotations

PACKAGE = "deepmetric"


def export(obj):
    """Registers `obj` with Keras under the `deepmetric>` prefix.

    A model that uses a registered loss, layer, optimizer or schedule saves to
    `.keras` and loads back with `keras.saving.load_model(path)` in safe mode,
    without `custom_objects`, once `deepmetric` has been imported.
    """
    import keras

    return keras.saving.register_keras_serializable(package=PACKAGE)(obj)


def normalize_name(text: str) -> str:
    """The key names are compared by: lower case, no `-` or `_`, no `deepmetric>`, no `loss`.

    `"triplet_semihard"`, `"TripletSemiHardLoss"`, `"triplet-semihard-loss"` and
    `"deepmetric>TripletSemiHardLoss"` all give `"tripletsemihard"`.
    """
    key = text.strip().lower()
    if key.startswith(f"{PACKAGE}>"):
        key = key[len(PACKAGE) + 1 :]
    key = key.replace("-", "").replace("_", "")
    if key.endswith("loss") and len(key) > len("loss"):
        key = key[: -len("loss")]
    return key


def lookup(identifier, classes, kind: str, *, instantiate: bool):
    """`get()` of a family of public classes (losses, heads), in the Keras style.

    `identifier` is None (returns None), an instance of one of `classes` (returned as it is),
    a name (`normalize_name` decides which class: the snake_case name, the class name, with
    or without `deepmetric>`), or a Keras config dict `{"class_name": name, "config": {...}}`
    (an instance built from the config). A name gives an instance with the default options
    when `instantiate`, else the class. Anything else is a ValueError / TypeError that lists
    the valid names.
    """
    if identifier is None:
        return None
    if isinstance(identifier, tuple(classes)):
        return identifier
    by_key = {normalize_name(cls.__name__): cls for cls in classes}
    if isinstance(identifier, dict):
        name, config = identifier.get("class_name"), identifier.get("config", {})
        if not isinstance(name, str) or not isinstance(config, dict):
            raise ValueError(
                f"A {kind} config must be {{'class_name': str, 'config': dict}}. "
                f"Received: {identifier!r}"
            )
        return _find(name, by_key, kind).from_config(config)
    if isinstance(identifier, str):
        cls = _find(identifier, by_key, kind)
        return cls() if instantiate else cls
    raise TypeError(
        f"Could not interpret {kind} identifier: {identifier!r}. Expected a name, a config "
        f"dict or a {kind} instance."
    )


def _find(name: str, by_key: dict, kind: str):
    cls = by_key.get(normalize_name(name))
    if cls is None:
        names = ", ".join(sorted(cls.__name__ for cls in by_key.values()))
        raise ValueError(f"Unknown {kind} {name!r}. Valid names: {names}")
    return cls
