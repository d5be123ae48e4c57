"""After training: predictions on your own images, the merged model, GGUF for llama.cpp, parity."""
