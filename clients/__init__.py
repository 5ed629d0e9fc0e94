"""The Flower ClientApp: a region's or merchant's data, local DP training, local evaluation."""
