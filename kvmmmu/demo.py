"""The tour printed by ``python -m kvmmmu demo``.

It grows as the MMUs land; today it shows the SPTE formats, a leaf SPTE's
life (fault, aging, dirty logging), MMIO SPTEs, the bulk API, role words and
the kernel-format trace, and the TDP MMU on a 64 GiB guest (populate at 2 MiB
and 4 KiB, dirty logging with eager split, a dirty round), and a workload
shaped like the kernel's dirty_log_perf_test on two MMU flavours.
"""
import time

import numpy as np

from kvmmmu import mmutrace
from kvmmmu._core import role as R
from kvmmmu._core import spte as S
from kvmmmu._core.spte import SpteFormat


def run(out):
    def say(text=""):
        print(text, file=out)

    ept = SpteFormat.ept(ad_bits=False)
    legacy = SpteFormat.legacy()
    say("kvmmmu demo — the KVM x86 MMU (Linux v6.18), modelled bit for bit\n")

    say("1. A 4 KiB EPT leaf for gfn 0x10 -> pfn 0x123456, A/D bits disabled")
    spte, _ = ept.make_spte(level=1, pte_access=S.ACC_ALL, pfn=0x123456, ad_disabled=True)
    say("   fault:         " + ept.decode_spte(spte, gfn=0x10, level=1, sptep=0x2000080))
    aged = ept.mark_spte_for_access_track(spte)
    say("   aged:          " + ept.decode_spte(aged, gfn=0x10, level=1, sptep=0x2000080)
        + f"   access-tracked={ept.is_access_track_spte(aged)}")
    say("   fast #PF fix:  " + ept.decode_spte(ept.restore_acc_track_spte(aged), gfn=0x10,
                                                level=1, sptep=0x2000080))

    say("\n2. A 2 MiB legacy/NPT leaf with the NX-huge-page mitigation on")
    spte, _ = legacy.make_spte(level=2, pte_access=S.ACC_ALL, pfn=0x40000, nx_huge_pages=True)
    say("   " + legacy.decode_spte(spte, gfn=0x40000, level=2, sptep=0x3000000))
    child = legacy.make_small_spte(spte, 1, 7, nx_huge_pages=True)
    say("   split, entry 7: " + legacy.decode_spte(child, gfn=0x40007, level=1, sptep=0x3001038))

    say("\n3. An MMIO SPTE caches 'no memslot here' with the memslots generation")
    mmio = legacy.make_mmio_spte(0xFEBF0, S.ACC_ALL, 0x1234)
    say(f"   spte {mmio:#018x}: gfn {legacy.get_mmio_spte_gfn(mmio):#x}, "
        f"generation {S.get_mmio_spte_generation(mmio):#x}, "
        f"present={S.is_shadow_present_pte(mmio)}")

    say("\n4. Role words, and the kvm_mmu_get_page line the kernel would trace")
    cr0_pg_wp, cr4_pae, efer_lme_lma_nx = (1 << 31) | (1 << 16) | 1, 1 << 5, (1 << 8) | (1 << 10) | (1 << 11)
    cpu_role = R.kvm_calc_cpu_role(cr0_pg_wp, cr4_pae, efer_lme_lma_nx)
    shadow_root = R.kvm_calc_shadow_mmu_root_page_role(cpu_role)
    tdp_root = R.kvm_calc_tdp_mmu_root_page_role(cpu_role, 4)
    child = R.kvm_mmu_child_role(shadow_root, 5, False, S.ACC_ALL)
    with mmutrace.capture("kvm_mmu_get_page") as ring:
        for role, gfn in ((shadow_root, 0x1000), (child, 0x1234), (tdp_root, 0)):
            mmutrace.kvm_mmu_get_page.emit(mmu_valid_gen=0, gfn=gfn, role=role.word,
                                           root_count=int(role.level == 4), unsync=False,
                                           created=True)
    for role, line in zip((shadow_root, child, tdp_root), ring.lines()):
        say(f"   {role.word:#010x}  {line}")

    n = 1 << 22
    say(f"\n5. Bulk API: {n:,} SPTEs in single nogil passes")
    pfns = np.random.default_rng(1).integers(0, 1 << 34, n, dtype=np.uint64)
    sptes = np.zeros(n, dtype=np.uint64)
    sptes.fill(0)                      # fault the pages in before timing
    t0 = time.perf_counter()
    legacy.make_spte_array(pfns, level=1, pte_access=S.ACC_ALL, out=sptes)
    t1 = time.perf_counter()
    dirty = legacy.clear_dirty_array(sptes)
    t2 = time.perf_counter()
    say(f"   make_spte_array  {1e9 * (t1 - t0) / n:5.2f} ns/SPTE")
    say(f"   clear_dirty      {1e9 * (t2 - t1) / n:5.2f} ns/SPTE ({dirty:,} were dirty)")
    say(f"   dirty now: {int(legacy.is_dirty_spte_array(sptes).sum())}")

    say("\n6. The TDP MMU on a 64 GiB guest (EPT, THP host memory)")
    from kvmmmu.host import HostConfig
    from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
    from kvmmmu.tdp_mmu import TdpMmu
    from kvmmmu.vm import VM
    GiB = 1 << 30
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
    big = vm.add_memory(0, 64 * GiB, thp=True, populate=True)
    small = vm.add_memory(64 * GiB, 4 * GiB, populate=True)          # 4 KiB host pages
    tdp = vm.register_mmu(TdpMmu(vm))
    vcpu = vm.vcpus[0]
    tdp.kvm_mmu_load(vcpu)
    t0 = time.perf_counter()
    tdp.map_memory(vcpu, np.arange(big.base_gfn, big.base_gfn + big.npages, 512, dtype=np.uint64))
    t1 = time.perf_counter()
    tdp.map_memory(vcpu, np.arange(small.base_gfn, small.base_gfn + small.npages, dtype=np.uint64))
    t2 = time.perf_counter()
    st = vm.arena.page_stats
    say(f"   populate 64 GiB at 2 MiB: {t1 - t0:.2f} s; 4 GiB of 4 KiB pages: {t2 - t1:.2f} s")
    say(f"   pages_2m={st['pages_2m']:,} pages_4k={st['pages_4k']:,} "
        f"tables={tdp.core.tdp_mmu_pages:,} table memory {vm.arena.nbytes / 2**20:.1f} MiB")
    t0 = time.perf_counter()
    vm.set_user_memory_region(big.id, KVM_MEM_LOG_DIRTY_PAGES, 0, 64 * GiB, big.userspace_addr)
    t1 = time.perf_counter()
    st = vm.arena.page_stats
    say(f"   dirty logging on (eager split to 4 KiB, write-protect): {t1 - t0:.2f} s; "
        f"pages_4k={st['pages_4k']:,}, table memory {vm.arena.nbytes / 2**20:.1f} MiB")
    vm.get_dirty_log(big.id)
    written = np.random.default_rng(2).choice(big.npages, 10000, replace=False)
    t0 = time.perf_counter()
    for gfn in written.tolist():
        tdp.page_fault(vcpu, gfn, write=True)
    t1 = time.perf_counter()
    dirty = int(np.unpackbits(vm.get_dirty_log(big.id).view(np.uint8)).sum())
    say(f"   10,000 guest writes: {1e6 * (t1 - t0) / 10000:.1f} us per fault "
        f"(pf_fast={vcpu.stat.pf_fast:,}); the dirty round reports {dirty:,} pages")
    assert dirty == 10000

    say("\n7. A selftest-shaped workload (kvmmmu.workloads): dirty_log_perf_test with 4 vCPUs,"
        "\n   THP backing, 2 passes: the TDP MMU (its batch guest access in C) at 4 GiB, the"
        "\n   shadow MMU's TDP (kvm.tdp_mmu=N, a Python fault path) at 64 MiB")
    from kvmmmu import workloads as W
    for mmu, mib in (("tdp_mmu", 1024), ("tdp", 16)):
        rep = W.run("dirty_log", mmu=mmu, vcpus=4, vcpu_mib=mib, iterations=2,
                    backing="anonymous_thp")
        s = rep.summary
        say(f"   {mmu:8s} {4 * mib:5d} MiB: populate {s['populate_s']:.2f} s, "
            f"dirty pass {s['dirty_s']:.2f} s, get log {s['get_dirty_log_s']:.3f} s; "
            f"faults {s['pf_taken']:,} (fast {s['pf_fast']:,}), "
            f"bitmaps exact: {s['check_dirty_log_exact']}")
    say("   (python -m kvmmmu run --list: every workload; run dirty_log --help: its parameters)")


def run_tdx(out):
    """``python -m kvmmmu demo --tdx``: one TD's life in both code generations
    (mirror-tdx.md §0), side by side: the initial image (v6.18 premaps each
    page - the mirror leaf comes first, counted in ``nr_premapped``, and
    PAGE.ADD follows from the populate callback; Gen B issues PAGE.ADD inside
    ``set_external_spte``), FINALIZE, a private fault (SEPT.ADD, AUG), a
    conversion to shared (BLOCK, TRACK, REMOVE, WBINVD) and the teardown
    (the leaves while the HKID is assigned, then RECLAIM of the S-EPT pages
    bottom-up and the TDR).  Returns ``{era: [(step, [SEAMCALL names],
    nr_premapped after)]}``."""
    from kvmmmu.host import HostConfig
    from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
    from kvmmmu.vm import VM

    def say(text=""):
        print(text, file=out)

    steps = {}
    for era in ("v6.18", "genB"):
        vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", tdx_era=era)
        t = vm.tdx
        assert t.init_vm() == 0 and t.init_vcpu(vm.vcpus[0]) == 0
        vm.add_memory(0, 1 << 30, guest_memfd=True)
        vm.set_memory_attributes(0, 64 << 20, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        src = vm.host.mmap(2 << 12, populate=True)
        log = steps[era] = []

        def step(name, fn):
            n0 = len(t.module.calls)
            fn()
            names = [c.name.removeprefix("tdh_") for c in t.module.calls[n0:]
                     if c.name != "td_exit"]
            log.append((name, names, t.nr_premapped))

        v = vm.vcpus[0]
        if era == "v6.18":
            # the two halves of one INIT_MEM_REGION page, seen apart
            step("image: kvm_tdp_map_page", lambda: vm.mmu_backend.kvm_tdp_map_page(
                v, 0x100000, (1 << 32) | (1 << 49)) if v.kvm_mmu_reload() == 0 else None)
            step("image: populate -> PAGE.ADD", lambda: t.init_mem_region(v, 0x100000, 1, src))
        else:
            step("image: INIT_MEM_REGION", lambda: t.init_mem_region(v, 0x100000, 1, src))
        step("image: next page", lambda: t.init_mem_region(v, 0x101000, 1, src + 4096))
        step("FINALIZE", t.finalize_vm)
        step("private fault", lambda: t.handle_ept_violation(v, 0x400000))
        step("convert to shared", lambda: vm.set_memory_attributes(0x400000, 0x1000, 0))
        step("teardown", t.destroy_vm)
        assert not vm.bugged

    say("A TD's life in both TDX code generations (SEAMCALLs per step; premapped = "
        "nr_premapped after it)\n")
    for era, log in steps.items():
        say(f"  {era}{'  (the modelled kernel)' if era == 'v6.18' else '  (newer)'}")
        for name, calls, premapped in log:
            if len(calls) <= 6:
                shown = ", ".join(calls)
            else:               # counted, in the order they first appear
                counts = {}
                for c in calls:
                    counts[c] = counts.get(c, 0) + 1
                shown = ", ".join(c + (f" x{n}" if n > 1 else "") for c, n in counts.items())
            say(f"    {name:30s} premapped={premapped}  {shown or '(no SEAMCALL)'}")
        say()
    say("v6.18 maps the mirror leaf first and counts it premapped until the populate "
        "callback's PAGE.ADD;\nGen B never has a mirror leaf without its S-EPT leaf.")
    return steps
