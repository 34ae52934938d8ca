"""Write a tiny random-weight Llama (Hugging Face folder with a tokenizer) to the folder given."""

import sys

from rotgraph.testing import make_tiny_model

if __name__ == "__main__":
    print(make_tiny_model(sys.argv[1], "llama", seed=0))
