"""Model core: registry, blocks, YAML parser, `models.yolo.Model`, torchvision weights.

Nothing is imported here, so `import models` stays free of side effects; import the submodules.
"""
