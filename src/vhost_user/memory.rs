//! Guest memory as the frontend shares it: regions mapped from the fds of SET_MEM_TABLE and
//! ADD_MEM_REG, and the translation of the frontend's virtual addresses (used for the vring
//! addresses) to guest physical addresses.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

/// Guest memory as the workers see it; replaced atomically when the table changes.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Most regions we accept (GET_MAX_MEM_SLOTS; QEMU caps at 509 too).
pub const MAX_MEM_SLOTS: u64 = 509;

/// Errors mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map a region of {size:#x} bytes at guest address {gpa:#x}")]
    Map {
        gpa: u64,
        size: u64,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("region at guest address {gpa:#x} is invalid or overlaps another")]
    Region { gpa: u64 },
    #[error("no region at guest address {gpa:#x}")]
    NoRegion { gpa: u64 },
    #[error("too many memory regions")]
    TooMany,
    #[error("frontend address {0:#x} is not in any region")]
    Translate(u64),
}

/// One mapped region: where the frontend has it, where the guest has it.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// The memory table of one connection.
pub struct MemoryTable {
    mem: GuestMemory,
    mappings: Vec<Mapping>,
}

impl Default for MemoryTable {
    fn default() -> Self {
        Self {
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
        }
    }
}

fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<GuestRegionMmap, MemoryError> {
    let gpa = region.guest_phys_addr;
    let mmap = region
        .mmap_region(file)
        .map_err(|source| MemoryError::Map {
            gpa,
            size: region.memory_size,
            source,
        })?;
    GuestRegionMmap::new(mmap, GuestAddress(gpa)).ok_or(MemoryError::Region { gpa })
}

impl MemoryTable {
    /// The shared handle workers read memory through.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// SET_MEM_TABLE: replaces every region.
    pub fn set(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        if u64::try_from(regions.len()).map_or(true, |n| n > MAX_MEM_SLOTS) {
            return Err(MemoryError::TooMany);
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (region, file) in regions.iter().zip(files) {
            mapped.push(map_region(region, file)?);
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|_| MemoryError::Region {
            gpa: regions.first().map_or(0, |r| r.guest_phys_addr),
        })?;
        self.mem
            .lock()
            .map_err(|_| MemoryError::TooMany)?
            .replace(mem);
        self.mappings = mappings;
        Ok(())
    }

    /// ADD_MEM_REG: adds one region.
    pub fn add(&mut self, region: &VhostUserMemoryRegion, file: File) -> Result<(), MemoryError> {
        if u64::try_from(self.mappings.len()).map_or(true, |n| n >= MAX_MEM_SLOTS) {
            return Err(MemoryError::TooMany);
        }
        let gpa = region.guest_phys_addr;
        let mapped = Arc::new(map_region(region, file)?);
        let mem = vm_memory::GuestAddressSpace::memory(&self.mem)
            .insert_region(mapped)
            .map_err(|_| MemoryError::Region { gpa })?;
        self.mem
            .lock()
            .map_err(|_| MemoryError::TooMany)?
            .replace(mem);
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa,
        });
        Ok(())
    }

    /// REM_MEM_REG: removes the region at the given guest address.
    pub fn remove(&mut self, region: &VhostUserMemoryRegion) -> Result<(), MemoryError> {
        let gpa = region.guest_phys_addr;
        let (mem, _) = vm_memory::GuestAddressSpace::memory(&self.mem)
            .remove_region(GuestAddress(gpa), region.memory_size)
            .map_err(|_| MemoryError::NoRegion { gpa })?;
        self.mem
            .lock()
            .map_err(|_| MemoryError::TooMany)?
            .replace(mem);
        self.mappings.retain(|m| m.gpa != gpa);
        Ok(())
    }

    /// The guest physical address of frontend virtual address `va`.
    pub fn va_to_gpa(&self, va: u64) -> Result<u64, MemoryError> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| m.gpa + (va - m.vmm_addr))
            .ok_or(MemoryError::Translate(va))
    }
}
