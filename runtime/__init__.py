"""Model execution shared by the analyzer and the gate: backends (torch, llama.cpp), tokenization, datasets."""
