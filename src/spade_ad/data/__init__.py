"""What comes in: `images` (decoding and checks), `inputs` (what users pass, read ahead in threads), `datasets`
(MVTec / folder layouts), `synthetic` and `synthetic_drawing` (generated data) and `modelfile` (the model
file format).
"""
