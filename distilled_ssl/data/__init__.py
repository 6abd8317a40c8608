"""Image data: source sets, labelled downstream sets, SSL augmentation and pictures of images."""
