"""The algorithm: feature extraction (`features`, `backbones`, `geometry`), the stored training features
(`feature_store`, `gallery`), the exact nearest-neighbour search (`search_torch`, `search_numpy`), the maps and
scores (`maps_numpy`, `maps_torch`, `scoring`, `device_maps`), thresholds (`calibration`), explanations, tiles
(`tiles` numpy, `tiled` torch) and `device`. Twins that do one thing in torch and in numpy are named alike.
"""
