"""What a prediction becomes on disk and on screen: `writers` (scores.csv, regions.jsonl, skipped.csv), `image_files`
(overlays, masks, heat maps, maps, explanations, each written whole), `visualize` (the pictures) and `png`
(fast PNG encoding).
"""
