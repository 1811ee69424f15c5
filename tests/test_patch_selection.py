import torch

from spacil.ops.patch_selection import patch_relevance, random_patches, select_top_k, token_similarity


def test_relevance_max_and_mean_over_real_tokens_only():
    g = torch.Generator().manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(2, 5, 4, generator=g), dim=-1)
    semantic = torch.nn.functional.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    brute = torch.einsum("bnd,cmd->bcnm", patches, semantic)
    r_max = patch_relevance(patches, semantic, mask, "max")
    torch.testing.assert_close(r_max[:, 0], brute[:, 0].amax(-1))
    torch.testing.assert_close(r_max[:, 1], brute[:, 1, :, 0])
    assert (r_max[:, 2] == 0).all()
    r_mean = patch_relevance(patches, semantic, mask, "mean")
    torch.testing.assert_close(r_mean[:, 0], brute[:, 0].mean(-1))
    torch.testing.assert_close(token_similarity(patches, semantic), brute.permute(0, 2, 1, 3))


def test_top_k_and_random_selection():
    relevance = torch.tensor([[[0.1, 0.9, 0.3, 0.8]]])
    indices, values = select_top_k(relevance, 2)
    assert indices.tolist() == [[[1, 3]]]
    torch.testing.assert_close(values, torch.tensor([[[0.9, 0.8]]]))
    assert select_top_k(relevance, 10)[0].shape[-1] == 4
    g = torch.Generator().manual_seed(1)
    picked = random_patches(3, 5, 10, 4, g)
    assert picked.shape == (3, 5, 4) and (picked[:, 0] == picked[:, 4]).all()
    assert all(len(set(row.tolist())) == 4 for row in picked[:, 0])
