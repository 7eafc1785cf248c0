"""Interim stand-in for kvmmmu.tdx (the KVM TDX side), until the full KvmTdx lands: the four hooks over the TDX-module model, nothing else."""
import errno as E
from kvmmmu.tdx_module import TdxModule

class KvmTdx:
    def __init__(self, vm, module=None, era="v6.18"):
        self.vm, self.era = vm, era
        self.module = module or TdxModule(era=era)
        self.td = None
        self.nr_premapped = 0
        self.pre_fault_allowed = False
    def lv(self, level):  # pg_level -> wrapper arg
        return level - 1 if self.era == "v6.18" else level
    def init_vm(self, gpaw=48):
        r, self.td = self.module.tdh_mng_create(0x7000000, 5, ept_levels=4)
        assert r.ok, r
        self.vm.gfn_direct_bits = 1 << 35
    def finalize(self):
        assert self.module.tdh_mr_finalize(self.td).ok
        self.pre_fault_allowed = True
    def link_external_spt(self, gfn, level, ext):
        r = self.module.tdh_mem_sept_add(self.td, gfn << 12, self.lv(level), ext)
        return 0 if r.ok else (-E.EBUSY if r.busy else -E.EIO)
    def set_external_spte(self, gfn, level, pfn):
        if self.era == "genB":
            pfn = (pfn >> 12) & ((1 << 40) - 1)
        r = self.module.tdh_mem_page_aug(self.td, gfn << 12, self.lv(level), pfn)
        return 0 if r.ok else (-E.EBUSY if r.busy else -E.EIO)
    def remove_external_spte(self, gfn, level, pfn):
        m, td, gpa = self.module, self.td, gfn << 12
        for step in (lambda: m.tdh_mem_range_block(td, gpa, self.lv(level)),
                     lambda: m.tdh_mem_track(td),
                     lambda: m.tdh_mem_page_remove(td, gpa, self.lv(level))):
            r = step()
            if not r.ok:
                self.vm.kvm_bug(f"remove {r}")
                return -E.EIO
        return 0
    def free_external_spt(self, gfn, level, ext):
        r = self.module.tdh_phymem_page_reclaim(ext)
        return 0 if (r[0] if isinstance(r, tuple) else r).ok else -E.EIO
    def audit(self):
        return []
