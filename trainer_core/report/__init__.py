"""What a run shows and logs: the loss chart, TensorBoard, labelled grids, the dataset preview."""
