"""The demo CLIP: a synthetic captioned-shapes data set and the script that trains on it."""
