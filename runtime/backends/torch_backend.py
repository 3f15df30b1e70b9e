"""The reference backend: our eager PyTorch modules, unchanged."""


def prepare_torch(components, **options):
    if options:
        raise ValueError(f"the torch backend takes no options, got {sorted(options)}")
    return components
