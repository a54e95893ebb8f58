"""Product quantization: the quantizer module with EMA codebooks, the codec (encode / decode),
k-means++ seeding, and the compiled CPU decode kernel (csrc/)."""
